"""The labelling page: `create_app(folder)` builds the local app that `facerace label` runs."""
