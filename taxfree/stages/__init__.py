"""One module per pipeline stage; each turns its config section into library calls."""
