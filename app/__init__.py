"""The application layer: the ``unet`` command line. It calls the Prefect flows (``flows/``) or the library's
front doors (``unetcore``) directly with ``--no-prefect``; the library itself never imports this package."""
