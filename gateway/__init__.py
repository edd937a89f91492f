"""Shared plumbing of the gateway's services: settings, gRPC server and error helpers, logging, CLI."""
