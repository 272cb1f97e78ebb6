"""The HTTP API: thin routes over ``service.studies``; errors mapped in one place."""
