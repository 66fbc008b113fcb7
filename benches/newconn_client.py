#!/usr/bin/env python3
"""count.py's newconn client: N HTTP/1.1 requests one after another, each on a connection of its
own (`Connection: close`, read to EOF). Prints "N succeeded" as h2load does.

Usage: newconn_client.py -n N PORT"""

import socket
import sys


def main():
    n, port = int(sys.argv[sys.argv.index("-n") + 1]), int(sys.argv[-1])
    req = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    ok = 0
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(req)
            got = b""
            while True:
                b = s.recv(65536)
                if not b:
                    break
                got += b
        ok += got.startswith(b"HTTP/1.1 200")
    print(f"{ok} succeeded")


if __name__ == "__main__":
    main()
