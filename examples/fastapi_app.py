"""FastAPI with its sessions in memcached. Run: MEMSESS_SAVE_PATH="tcp://127.0.0.1:11211"
python examples/fastapi_app.py   (without MEMSESS_SAVE_PATH, on three memcached servers
started for the demo), then open http://127.0.0.1:8000/login/alice, /, /me, /logout."""

import os
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from memsess.adapters import AsyncSession
from memsess.adapters.asgi import SessionMiddleware, load_session


async def current_session(request: Request) -> AsyncSession:
    """Read the session from memcached, for the routes that ask for it (lazy=True)."""
    return await load_session(request)


SessionDep = Annotated[AsyncSession, Depends(current_session)]
router = APIRouter(default_response_class=PlainTextResponse)


@router.get("/")
async def index(session: SessionDep) -> str:
    session["visits"] = session.get("visits", 0) + 1
    return f"{session.get('user', 'anonymous')}, visit {session['visits']}"


@router.get("/login/{user}")
async def login(user: str, session: SessionDep) -> str:
    session["user"] = user
    session.regenerate()  # a new session id at login: no session fixation
    return f"logged in as {user}"


@router.get("/me", response_class=JSONResponse)
async def me(session: SessionDep) -> dict[str, str | None]:
    return {"user": session.get("user")}


@router.get("/logout")
async def logout(session: SessionDep) -> str:
    session.clear()  # deletes every copy and the cookie
    return "logged out"


@router.get("/health")
async def health() -> str:
    return "ok"  # never touches the session: no memcached round trip


def create_app(save_path: str) -> FastAPI:
    app = FastAPI()
    # secure=True behind HTTPS; the store built from the save_path is closed at shutdown.
    app.add_middleware(SessionMiddleware, dsn=save_path, lazy=True)
    app.include_router(router)
    return app


app = create_app(os.environ.get("MEMSESS_SAVE_PATH", "tcp://127.0.0.1:11211"))

if __name__ == "__main__":
    import uvicorn

    if "MEMSESS_SAVE_PATH" in os.environ:
        uvicorn.run(app)
    else:
        from memsess.testing import LocalCluster

        with LocalCluster(3) as cluster:
            uvicorn.run(create_app(cluster.dsn()))
