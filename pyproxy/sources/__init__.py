"""Where Services, EndpointSlices and Nodes come from: a YAML file (the API watch comes later)."""
