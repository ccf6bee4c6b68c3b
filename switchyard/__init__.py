"""Shared plumbing: settings, logging, the database and the embedded PostgreSQL server."""
