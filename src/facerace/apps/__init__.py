"""The apps on top of the library: the CLI, the video stream, the HTTP service and their output writers."""
