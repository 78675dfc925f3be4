"""What every python-backend model shares: parameters and error responses, the stub watchdog, cancellation."""
