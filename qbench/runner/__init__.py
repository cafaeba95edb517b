"""The parent process: one child process per cell, every record kept; scheduling, resume."""
