#!/usr/bin/env python
"""Run: MEMSESS_SAVE_PATH="tcp://127.0.0.1:11211"
python examples/django_project/manage.py runserver   (then open http://127.0.0.1:8000/)"""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
