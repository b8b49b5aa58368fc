"""The job application: job files, running and resuming jobs, and reading what they recorded."""
