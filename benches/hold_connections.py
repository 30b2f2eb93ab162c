"""Holds N keep-alive connections to a gateway on 127.0.0.1 and prints its RSS before,
while they are held, and after they closed (BENCHMARKS.md, "Memory after a burst").

Usage: python3 benches/hold_connections.py PORT N GATEWAY_PID
(raise `ulimit -n` for the gateway; this script raises its own limit to 20000).
Each connection sends one `GET /healthz` (answered by the gateway itself) and stays open.
"""
import socket, sys, time, resource
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
port=int(sys.argv[1]); n=int(sys.argv[2]); pid=sys.argv[3]
def rss():
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"): return l.split()[1]+" kB"
print("before", rss(), flush=True)
cs=[]
for i in range(n):
    s=socket.create_connection(("127.0.0.1",port))
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    cs.append(s)
for s in cs:
    s.settimeout(5); s.recv(4096)
time.sleep(1)
print("during", n, "held", rss(), flush=True)
for s in cs: s.close()
time.sleep(3)
print("after close 3 s", rss(), flush=True)
time.sleep(5)
print("after close 8 s", rss(), flush=True)
