"""Consumers: validate, order, batch and store the records that producers send."""
