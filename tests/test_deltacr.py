import time, pytest
import deltabox

LAUNCH = ("import subprocess, sys\n"
          "p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=open(sys.argv[1], 'ab'),"
          " stderr=subprocess.STDOUT, start_new_session=True)\n"
          "print(p.pid)\n")

def spawn(sbx, *argv, log="/dev/null"):
    r = sbx.exec(["python3", "-c", LAUNCH, log, *argv]).check()
    return int(r.stdout)

CASES = {
 "alg": "import socket,time\ns=socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET)\ns.bind(('hash','sha256'))\nprint('ok',flush=True)\ntime.sleep(1000)",
 "iouring": "import ctypes,time\nlibc=ctypes.CDLL(None,use_errno=True)\np=ctypes.create_string_buffer(120)\nfd=libc.syscall(425,8,p)\nprint('fd',fd,ctypes.get_errno(),flush=True)\ntime.sleep(1000)",
 "perf": "import ctypes,time\nlibc=ctypes.CDLL(None,use_errno=True)\na=ctypes.create_string_buffer(128)\nimport struct\nstruct.pack_into('IIQ',a,0,1,128,0)\nfd=libc.syscall(298,a,0,-1,-1,0)\nprint('fd',fd,ctypes.get_errno(),flush=True)\ntime.sleep(1000)",
 "packet": "import socket,time\ns=socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\nprint('ok',flush=True)\ntime.sleep(1000)",
 "uffd": "import ctypes,time\nlibc=ctypes.CDLL(None,use_errno=True)\nfd=libc.syscall(323,0)\nprint('fd',fd,ctypes.get_errno(),flush=True)\ntime.sleep(1000)",
 "vsock": "import socket,time\ns=socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\nprint('ok',flush=True)\ntime.sleep(1000)",
 "netlink_audit": "import socket,time\ns=socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 9)\nprint('ok',flush=True)\ntime.sleep(1000)",
 "pidfd": "import os,time\nfd=os.pidfd_open(1)\nprint('ok',fd,flush=True)\ntime.sleep(1000)",
 "bpf": "import ctypes,time,struct\nlibc=ctypes.CDLL(None,use_errno=True)\na=ctypes.create_string_buffer(struct.pack('IIII',2,4,4,1)+b'\\0'*100)\nfd=libc.syscall(321,0,a,120)\nprint('fd',fd,ctypes.get_errno(),flush=True)\ntime.sleep(1000)",
}

@pytest.mark.parametrize("case", list(CASES))
def test_probe(demo, case):
    demo.write_file("/tmp/p.py", CASES[case])
    pid = spawn(demo, "python3", "/tmp/p.py", log="/tmp/p.log")
    time.sleep(0.5)
    print(case, demo.read_file("/tmp/p.log"))
    try:
        ck = demo.checkpoint("x", full=True)
        print(case, "CHECKPOINT OK")
        time.sleep(0.5)
        r = demo.rollback(ck)
        print(case, "rollback", r.path)
    except deltabox.DeltaboxError as e:
        print(case, type(e).__name__, e)
    print(case, "after:", demo.exec(f"ls -l /proc/{pid}/fd; echo alive").stdout)
