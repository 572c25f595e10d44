"""The example scripts train (the code blocks of the README and of docs/ run in test_docs.py)."""

from helpers import load_script


def test_plain_pytorch_example_trains_with_nusam():
    example = load_script("examples/plain_pytorch.py")
    train_accuracy, test_accuracy = example.train(epochs=4)
    assert test_accuracy > 0.85 and train_accuracy > 0.85


def test_dropin_example_trains_on_the_digits():
    example = load_script("examples/dropin.py")
    assert example.main(epochs=4) > 0.85
