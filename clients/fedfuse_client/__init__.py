"""fedfuse's Flower ClientApp: train locally, upload once, fine-tune a personalized initializer."""
