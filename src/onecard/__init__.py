"""onecard: plan, check, run, evaluate and export LLM fine-tunes on one GPU, with numbers that hold."""

__version__ = "0.1.0"
