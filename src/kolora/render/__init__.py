"""The render and grid stages: tiles of the prompt set and the storyboard."""
