"""Authentication and authorisation shared by every service: principals, credentials, the table of
what each method needs, service identity."""
