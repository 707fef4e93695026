"""easy-VQA evaluation task."""
