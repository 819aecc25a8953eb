"""fsltool: few-shot classification by meta-learning, as a file-based command-line workflow."""

__version__ = "0.2.0"
