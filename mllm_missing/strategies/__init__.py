"""Methods that make a frozen model robust to missing modalities, one folder per family."""
