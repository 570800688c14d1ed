"""Models: the zoo catalogue, source models and the graft, parts by resolution, freezing."""
