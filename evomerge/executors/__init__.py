"""Where candidates are evaluated: the executor protocol, in-process and Ray implementations, workers."""
