"""The server kit every Corral service is built with."""
