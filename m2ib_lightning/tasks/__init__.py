"""The runs behind ``train.py``: one function per task, taking a validated config."""
