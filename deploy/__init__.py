"""Deployment helpers: a Dockerfile parser and the replay of its install and start steps (see ``docs/deploy.md``)."""
