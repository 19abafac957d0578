"""The project's tests beyond the lesson's own (test_mnist_mlp.py at the root); conftest.py holds the fixtures."""
