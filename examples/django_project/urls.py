"""One view that counts visits in the session."""

from django.http import HttpRequest, HttpResponse
from django.urls import path


def index(request: HttpRequest) -> HttpResponse:
    request.session["visits"] = request.session.get("visits", 0) + 1
    return HttpResponse(f"visit {request.session['visits']}\n", content_type="text/plain")


urlpatterns = [path("", index)]
