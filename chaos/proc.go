package chaos

import (
	"bytes"
	"encoding/json"
	"net"
	"net/rpc"
	"os"
	"os/exec"
	"sync"
	"syscall"
)

// Serve serves c over net/rpc on a free port of 127.0.0.1 for worker
// processes; close the returned listener to stop accepting.
func Serve(c *Coord) (net.Listener, error) {
	srv := rpc.NewServer()
	if err := srv.RegisterName("Coord", c); err != nil {
		return nil, err
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			go srv.ServeConn(conn)
		}
	}()
	return l, nil
}

// Proc is a worker process: the test binary run again with WorkerEnv set.
type Proc struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error

	mu  sync.Mutex
	out bytes.Buffer
}

type lockedWriter struct{ p *Proc }

func (w lockedWriter) Write(b []byte) (int, error) {
	w.p.mu.Lock()
	defer w.p.mu.Unlock()
	return w.p.out.Write(b)
}

// StartWorker starts a worker process running cfg.
func StartWorker(cfg WorkerConfig) (*Proc, error) {
	js, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	p := &Proc{done: make(chan struct{})}
	p.cmd = exec.Command(os.Args[0], "-test.run=^$")
	p.cmd.Env = append(os.Environ(), WorkerEnv+"="+string(js))
	p.cmd.Stdout, p.cmd.Stderr = lockedWriter{p}, lockedWriter{p}
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	return p, nil
}

// Signal sends sig (SIGSTOP, SIGCONT, SIGKILL) to the worker.
func (p *Proc) Signal(sig syscall.Signal) error { return p.cmd.Process.Signal(sig) }

// Done is closed when the process has exited.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Err is the process's exit error, after Done.
func (p *Proc) Err() error { return p.err }

// Output is what the process printed.
func (p *Proc) Output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.String()
}

// Kill kills the process (resuming it first if paused) and waits for it.
func (p *Proc) Kill() {
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}
