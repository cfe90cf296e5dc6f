import time
import deltabox

LAUNCH = ("import subprocess, sys\n"
          "p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=open(sys.argv[1], 'ab'),"
          " stderr=subprocess.STDOUT, start_new_session=True)\n"
          "print(p.pid)\n")

def spawn(sbx, *argv, log="/dev/null"):
    r = sbx.exec(["python3", "-c", LAUNCH, log, *argv]).check()
    return int(r.stdout)

def test_smoke(demo, client):
    t=time.monotonic()
    pid = spawn(demo, "sh", "-c", 'i=0; while true; do i=$((i+1)); echo $i > /tmp/c; sleep 0.1; done')
    print("spawn", time.monotonic()-t)
    time.sleep(0.5)
    t=time.monotonic()
    ck = demo.checkpoint("a", full=True)
    print("ckpt", time.monotonic()-t)
    print(ck)
    v0 = demo.read_file("/tmp/c")
    time.sleep(1)
    t=time.monotonic()
    r = demo.rollback(ck)
    print("rb", time.monotonic()-t)
    print(r.path, r.timings_ms)
    v1 = demo.read_file("/tmp/c")
    time.sleep(0.3)
    print(v0, v1, demo.read_file("/tmp/c"))
    print(demo.exec("ls /proc; cat /proc/*/cmdline | tr '\\0' ' '").stdout.decode())
