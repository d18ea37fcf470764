"""argparse value types shared by the scripts (prepare_data.py, evaluate.py): each turns a bad value into
argparse's own one-line usage error (exit code 2) naming what was expected."""
import argparse


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value
