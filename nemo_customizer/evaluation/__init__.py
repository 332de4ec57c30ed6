"""Evaluation of a model and its adapter on held-out data: task metrics, loss and perplexity, before and after."""
