"""Lightning callbacks of m2ib-lightning (attribution export, TensorBoard logging)."""
