"""migd: live migration of AMD SEV confidential guests over TCP."""

__version__ = "0.1.0"
