"""Tools to watch and explain a stack: traces, diff, explain, status and the shell."""
