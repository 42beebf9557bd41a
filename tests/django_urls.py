"""Views and URLs of the Django app the adapter tests drive (ROOT_URLCONF)."""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse
from django.urls import path

import memsess


class SessionOutageMiddleware:
    """The outage middleware of docs/adapters.md, as documented."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if isinstance(exception, memsess.ClusterError):
            return HttpResponse("Sessions are unavailable, please retry.", status=503)
        return None


def login(request: HttpRequest) -> HttpResponse:
    request.session.cycle_key()  # what django.contrib.auth.login() does
    request.session["user"] = request.GET["user"]
    return HttpResponse("ok")


def whoami(request: HttpRequest) -> HttpResponse:
    return HttpResponse(request.session.get("user", ""))


def logout(request: HttpRequest) -> HttpResponse:
    request.session.flush()  # what django.contrib.auth.logout() does
    return HttpResponse("bye")


def count(request: HttpRequest) -> HttpResponse:
    request.session["count"] = request.session.get("count", 0) + 1
    return HttpResponse(str(request.session["count"]))


async def acount(request: HttpRequest) -> HttpResponse:
    value = await request.session.aget("count", 0) + 1
    await request.session.aset("count", value)
    return HttpResponse(str(value))


def race(request: HttpRequest) -> HttpResponse:
    request.session["cart"] = ["book"]  # this request loaded the session...
    type(request.session)(request.session.session_key).delete()  # ...another logged out
    return HttpResponse("added")


def static(request: HttpRequest) -> HttpResponse:
    return HttpResponse("static")


urlpatterns = [
    path("login", login),
    path("whoami", whoami),
    path("logout", logout),
    path("count", count),
    path("acount", acount),
    path("race", race),
    path("static", static),
]
