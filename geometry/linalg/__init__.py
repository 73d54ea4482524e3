"""The factored linear algebra of low-rank task vectors (never ``B @ A``)."""
