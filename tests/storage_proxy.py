"""A fault-injecting HTTP proxy on 127.0.0.1 in front of a real storage server, for the tests: per request it
can add latency, answer with an error status (429, 503), or drop the connection, and the whole server can go
down (connections refused) and come back on the same port, as a real network and a real service do."""

import http.client
import http.server
import socket
import threading
import time
import urllib.parse

_HOP = {'connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'te', 'trailer', 'upgrade',
        'content-length'}


class FaultProxy:
  """`url`: where clients connect. Knobs (set them any time): `latency_s` per request; `fail(n, status)` answers
  the next n requests with `status`; `drop(n)` closes the connection of the next n requests unanswered;
  `every(n, faults)` gives every n-th request the next fault of `faults` in turn (a status or 'drop');
  `down()` / `up()`; `stall()` holds every request unanswered (a server that accepts connections but never
  answers) until `unstall()`, which closes them unforwarded. `requests` counts the requests that reached the
  proxy, `faults` those it failed."""

  def __init__(self, upstream_url: str, port: int, latency_s: float = 0.0):
    u = urllib.parse.urlsplit(upstream_url)
    self._upstream = (u.hostname, u.port)
    self.port, self.url, self.latency_s = port, f'http://127.0.0.1:{port}', latency_s
    self.requests = self.faults = 0
    self._fail, self._status, self._drop = 0, 503, 0
    self._every, self._kinds = 0, ()
    self._released = threading.Event()
    self._released.set()
    self._lock = threading.Lock()
    self._sockets = set()
    self._server = None
    self.up()

  def fail(self, n: int, status: int = 503) -> None:
    with self._lock:
      self._fail, self._status = n, status

  def drop(self, n: int) -> None:
    with self._lock:
      self._drop = n

  def every(self, n: int, faults=(503, 429, 'drop')) -> None:
    with self._lock:
      self._every, self._kinds = n, tuple(faults)

  def stall(self) -> None:
    self._released.clear()

  def unstall(self) -> None:
    self._released.set()

  def _next_fault(self):
    with self._lock:
      self.requests += 1
      fault = None
      if self._drop > 0:
        self._drop -= 1
        fault = 'drop'
      elif self._fail > 0:
        self._fail -= 1
        fault = self._status
      elif self._every and self.requests % self._every == 0:
        fault = self._kinds[(self.requests // self._every) % len(self._kinds)]
      self.faults += fault is not None
      return fault

  def up(self) -> None:
    if self._server is not None:
      return
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = 'HTTP/1.1'

      def setup(self):
        super().setup()
        with proxy._lock:
          proxy._sockets.add(self.connection)

      def finish(self):
        with proxy._lock:
          proxy._sockets.discard(self.connection)
        try:
          super().finish()
        except OSError:
          pass

      def log_message(self, *args):
        pass

      def _body(self) -> bytes:
        if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
          parts = []
          while True:
            size = int(self.rfile.readline().split(b';')[0].strip() or b'0', 16)
            if size == 0:
              while self.rfile.readline() not in (b'\r\n', b'\n', b''):
                pass
              return b''.join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline()
        return self.rfile.read(int(self.headers.get('Content-Length') or 0))

      def _forward(self):
        body = self._body()
        fault = proxy._next_fault()
        if not proxy._released.is_set():
          proxy._released.wait()
          fault = 'drop'  # Never forwarded: the client gave up on it long ago.
        if proxy.latency_s:
          time.sleep(proxy.latency_s)
        if fault == 'drop':
          self.close_connection = True
          self.connection.shutdown(socket.SHUT_RDWR)
          return
        if fault is not None:
          payload = b'{"error": {"code": %d, "message": "injected by the test proxy"}}' % fault
          self.send_response(fault)
          self.send_header('Content-Type', 'application/json')
          self.send_header('Content-Length', str(len(payload)))
          self.end_headers()
          self.wfile.write(payload)
          return
        conn = http.client.HTTPConnection(*proxy._upstream, timeout=60)
        try:
          headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
          headers['Content-Length'] = str(len(body))
          conn.request(self.command, self.path, body=body, headers=headers)
          r = conn.getresponse()
          data = r.read()
        finally:
          conn.close()
        self.send_response(r.status)
        for k, v in r.getheaders():
          if k.lower() not in _HOP:
            self.send_header(k, v)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        if self.command != 'HEAD':
          try:
            self.wfile.write(data)
          except OSError:  # The client gave up on this request (its timeout): nothing to answer.
            self.close_connection = True

      do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _forward

    class Server(http.server.ThreadingHTTPServer):
      daemon_threads = True

      def handle_error(self, request, client_address):
        pass  # A client that hung up (a dropped or cut connection): expected here.

    self._server = Server(('127.0.0.1', self.port), Handler)
    threading.Thread(target=self._server.serve_forever, daemon=True, name='storage_proxy').start()

  def down(self) -> None:
    """Stops listening (new connections are refused) and cuts every open connection."""
    if self._server is None:
      return
    self._server.shutdown()
    self._server.server_close()
    self._server = None
    with self._lock:
      for s in list(self._sockets):
        try:
          s.shutdown(socket.SHUT_RDWR)
        except OSError:
          pass

  def stop(self) -> None:
    self.down()
