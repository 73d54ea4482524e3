"""Reading adapters: folders, zips, file pairs and the hub; configs, module names, size limits."""
