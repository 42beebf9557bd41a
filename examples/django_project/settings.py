"""A Django project whose sessions live in memcached (two copies each, given two servers)."""

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = True
ALLOWED_HOSTS: list[str] = []
ROOT_URLCONF = "urls"
MIDDLEWARE = ["django.contrib.sessions.middleware.SessionMiddleware"]

SESSION_ENGINE = "memsess.adapters.django"
SESSION_MEMSESS = {
    # PHP's session.save_path syntax: "tcp://10.0.0.1:11211, tcp://10.0.0.2:11211?weight=2"
    "SAVE_PATH": os.environ.get("MEMSESS_SAVE_PATH", "tcp://127.0.0.1:11211"),
    # "REDUNDANCY": 2,  # copies of each session; default 2, or fewer if fewer servers
}
SESSION_COOKIE_AGE = 3600  # seconds, in the browser and in memcached
