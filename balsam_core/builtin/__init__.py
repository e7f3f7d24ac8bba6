"""Built-in plugins, registered through the same path as installed distributions."""
