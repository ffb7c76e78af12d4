"""A smart-HTTP Git server for tests: ``git http-backend`` run as CGI behind a threaded HTTP server."""

from __future__ import annotations

import base64
import hmac
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, urlsplit


class GitHttpServer:
    """Serve the bare repositories under ``root`` on ``http://127.0.0.1:<port>/<name>``.

    With ``username``/``password`` every request needs HTTP Basic auth.  Fetch, clone,
    ls-remote and push work; ``requests`` counts the HTTP requests received.
    """

    def __init__(self, root: Path, username: str | None = None, password: str | None = None):
        self.root = Path(root).resolve()
        self.username, self.password = username, password
        self.requests = 0
        self.last_stderr = b""
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="git-http", daemon=True)
        self._thread.start()

    def url(self, repo_name: str, with_credentials: bool = True) -> str:
        auth = ""
        if with_credentials and self.username is not None:
            auth = f"{quote(self.username, safe='')}:{quote(self.password or '', safe='')}@"
        return f"http://{auth}127.0.0.1:{self.port}/{repo_name}"

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(10)
        self._httpd.server_close()

    def __enter__(self) -> GitHttpServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _authorized(self, header: str | None) -> bool:
        if self.username is None:
            return True
        expected = "Basic " + base64.b64encode(f"{self.username}:{self.password or ''}".encode()).decode()
        return header is not None and hmac.compare_digest(header.encode(), expected.encode())

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format, *args):  # quiet test output
                pass

            def do_GET(self):
                self._cgi()

            def do_POST(self):
                self._cgi()

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # large pushes
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _cgi(self):
                with server._lock:
                    server.requests += 1
                if not server._authorized(self.headers.get("Authorization")):
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="git"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = self._read_body()
                parts = urlsplit(self.path)
                env = {key: value for key, value in os.environ.items() if not key.startswith("GIT_")}
                env.update(
                    {
                        "GIT_PROJECT_ROOT": str(server.root),
                        "GIT_HTTP_EXPORT_ALL": "1",
                        "GIT_CONFIG_NOSYSTEM": "1",
                        "GIT_CONFIG_GLOBAL": os.devnull,
                        "PATH_INFO": parts.path,
                        "QUERY_STRING": parts.query,
                        "REQUEST_METHOD": self.command,
                        "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                        "CONTENT_LENGTH": str(len(body)),
                        "REMOTE_ADDR": self.client_address[0],
                        "SERVER_PROTOCOL": "HTTP/1.0",
                    }
                )
                if server.username is not None:
                    env["REMOTE_USER"] = server.username
                for name, value in self.headers.items():  # Git-Protocol (v2), Content-Encoding (gzip)...
                    if name.lower() not in ("authorization", "content-type", "content-length"):
                        env["HTTP_" + name.upper().replace("-", "_")] = value
                proc = subprocess.run(
                    ["git", "-c", "http.receivepack=true", "http-backend"],
                    input=body,
                    env=env,
                    capture_output=True,
                    check=False,
                )
                server.last_stderr = proc.stderr
                head, payload = _split_cgi(proc.stdout)
                status, headers = 200, []
                for line in head.decode("latin-1").splitlines():
                    name, _, value = line.partition(":")
                    if name.lower() == "status":
                        status = int(value.split()[0])
                    elif name:
                        headers.append((name, value.strip()))
                if proc.returncode and not proc.stdout:
                    status, payload = 500, proc.stderr
                self.send_response(status)
                for name, value in headers:
                    if name.lower() != "content-length":
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        return Handler


def _split_cgi(output: bytes) -> tuple[bytes, bytes]:
    """Split a CGI response into headers and body at the first blank line (CRLF or LF line ends)."""
    crlf, lf = output.find(b"\r\n\r\n"), output.find(b"\n\n")
    if crlf != -1 and (lf == -1 or crlf < lf):
        return output[:crlf], output[crlf + 4 :]
    if lf != -1:
        return output[:lf], output[lf + 2 :]
    return output, b""
