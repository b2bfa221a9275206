"""An HTTP/2 client that shuts its flow-control window: one connection,
SETTINGS_INITIAL_WINDOW_SIZE = 0, N GETs of one path, PINGs answered (the
h2 package acknowledges them), no WINDOW_UPDATE ever. Holds the connection
until the agent closes it or `hold` seconds pass, then prints one JSON
line: {"headers": {status: count}, "resets": n, "closed_after": secs|null}.

usage: h2_zero_window.py HOST PORT SOURCE STREAMS PATH HOLD_SECS
"""

import json
import socket
import sys
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

host, port, source, streams, path, hold = sys.argv[1:7]
streams, hold = int(streams), float(hold)

sock = socket.socket()
sock.bind((source, 0))
sock.connect((host, int(port)))
conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
conn.initiate_connection()
conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
sock.sendall(conn.data_to_send())
for _ in range(streams):
    sid = conn.get_next_available_stream_id()
    conn.send_headers(
        sid,
        [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "agent")],
        end_stream=True,
    )
sock.sendall(conn.data_to_send())

started = time.monotonic()
statuses, resets, closed_after, goaway = {}, 0, None, False
sock.settimeout(0.2)
while time.monotonic() - started < hold:
    try:
        data = sock.recv(65536)
    except socket.timeout:
        continue
    except OSError:
        data = b""
    if not data:
        closed_after = time.monotonic() - started
        break
    if goaway:
        # After GOAWAY the h2 state machine takes nothing more; the bytes
        # still tell when the agent closes the connection.
        continue
    try:
        events = conn.receive_data(data)
    except h2.exceptions.ProtocolError:
        goaway = True
        continue
    for event in events:
        if isinstance(event, h2.events.ResponseReceived):
            status = dict(event.headers).get(b":status", b"?").decode()
            statuses[status] = statuses.get(status, 0) + 1
        elif isinstance(event, h2.events.StreamReset):
            resets += 1
        elif isinstance(event, h2.events.ConnectionTerminated):
            goaway = True
    out = conn.data_to_send()
    if out:
        try:
            sock.sendall(out)
        except OSError:
            pass
print(json.dumps({"headers": statuses, "resets": resets, "closed_after": closed_after}))
