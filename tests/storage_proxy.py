"""A fault-injecting HTTP proxy on 127.0.0.1 in front of a real storage server, for the tests: per request it
can add latency, answer with an error status (429, 503), or drop the connection, and the whole server can go
down (connections refused) and come back on the same port, as a real network and a real service do."""

import contextlib
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
      # socketserver's default backlog, 5, drops the SYNs of a burst of new connections (the read-ahead opens
      # up to 128 at once): each dropped one waits out TCP's 1 s, 3 s, 7 s... retransmits.
      request_queue_size = 1024

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


_METHODS = (b'GET ', b'HEAD ', b'POST ', b'PUT ', b'PATCH ', b'DELETE ')


class LatencyProxy:
  """A lean TCP proxy on 127.0.0.1 for the benchmarks: each HTTP request a client sends is held `latency_s`
  before it goes upstream (one round trip's delay per request on a keep-alive connection; order kept), answers
  pass straight through. One asyncio thread, no HTTP parsing: tens of µs of CPU per request, where
  `FaultProxy` (a thread and a parsed, re-sent request each) costs several hundred, taken from the cores a
  benchmark measures. `requests` counts the requests (chunks that start with an HTTP method)."""

  def __init__(self, upstream_url: str, port: int, latency_s: float):
    import asyncio
    u = urllib.parse.urlsplit(upstream_url)
    self._upstream = (u.hostname, u.port)
    self.port, self.url, self.latency_s, self.requests = port, f'http://127.0.0.1:{port}', latency_s, 0
    self._closing = False
    self._loop = asyncio.new_event_loop()
    started = threading.Event()

    def run():
      asyncio.set_event_loop(self._loop)
      self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, '127.0.0.1', port))
      started.set()
      self._loop.run_forever()
    self._thread = threading.Thread(target=run, daemon=True, name='latency-proxy')
    self._thread.start()
    started.wait(10)

  async def _handle(self, reader, writer):
    import asyncio
    try:
      up_reader, up_writer = await asyncio.open_connection(*self._upstream)
    except OSError:
      writer.close()
      return
    queue = asyncio.Queue()

    async def upstream():  # Forwards the client's chunks in order, each request at its due time.
      while (item := await queue.get()) is not None:
        due, data = item
        if (wait := due - self._loop.time()) > 0:
          await asyncio.sleep(wait)
        up_writer.write(data)
        await up_writer.drain()
      up_writer.close()

    async def downstream():
      while data := await up_reader.read(1 << 18):
        writer.write(data)
        await writer.drain()
      writer.close()

    tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
    try:
      while data := await reader.read(1 << 18):
        request = data.startswith(_METHODS)
        self.requests += request
        queue.put_nowait((self._loop.time() + (self.latency_s if request else 0.0), data))
    except (OSError, asyncio.CancelledError):  # Closed by the client, or by `stop`.
      pass
    finally:
      queue.put_nowait(None)
      for t in tasks if self._closing else ():
        t.cancel()
      with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*tasks, return_exceptions=True)

  def stop(self) -> None:
    import asyncio

    async def close():
      self._closing = True
      self._server.close()
      tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
      for t in tasks:
        t.cancel()
      await asyncio.gather(*tasks, return_exceptions=True)
    asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
    self._loop.call_soon_threadsafe(self._loop.stop)
    self._thread.join(5)
