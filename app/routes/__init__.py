"""HTTP routes, thin: parse, call the GenerationService, shape the response."""
