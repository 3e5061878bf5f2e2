"""fedfuse's Flower ServerApp: model-zoo store, Ray-parallel fit, personalization."""
