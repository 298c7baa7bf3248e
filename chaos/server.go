package chaos

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"
)

// Server is a private redis-server process on 127.0.0.1 and a free port,
// without persistence (--save "" --appendonly no): a restart loses every
// key. It can be paused (SIGSTOP), resumed (SIGCONT), killed (SIGKILL) and
// started again on the same port. It dies with the test binary (Pdeathsig).
type Server struct {
	Addr string

	dir  string
	args []string

	mu     sync.Mutex
	cmd    *exec.Cmd
	done   chan struct{}
	resets []int64
}

// Resets returns the instants (Mono) at which the server was killed: its
// data, every lock in it, was lost then.
func (s *Server) Resets() []int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.resets)
}

// ServerBinary is the redis-server binary StartServer runs: a path, or a
// name looked up on PATH, from REDLATCH_REDIS_SERVER (as for the root
// module's tests), else "redis-server".
func ServerBinary() string {
	if b := os.Getenv("REDLATCH_REDIS_SERVER"); b != "" {
		return b
	}
	return "redis-server"
}

// StartServer starts a redis-server (see ServerBinary). Close stops it for
// good.
func StartServer() (*Server, error) {
	sweepOnce.Do(sweepStale)
	dir, err := os.MkdirTemp("", "redlatch-chaos-"+strconv.Itoa(os.Getpid())+"-")
	if err != nil {
		return nil, err
	}
	var errs []error
	for attempt := 0; attempt < 5; attempt++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			_ = os.RemoveAll(dir)
			return nil, err
		}
		port := strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
		_ = l.Close()
		s := &Server{Addr: "127.0.0.1:" + port, dir: dir, args: []string{
			"--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
			"--dir", dir, "--protected-mode", "no", "--loglevel", "warning",
		}}
		if err = s.Start(); err == nil {
			return s, nil
		}
		errs = append(errs, err)
	}
	_ = os.RemoveAll(dir)
	return nil, errors.Join(errs...)
}

var sweepOnce sync.Once

// sweepStale removes the directories of test binaries that died without
// their cleanups (a panic, -timeout, a kill): Pdeathsig killed their
// servers, but nothing removed their directories. A directory is named
// after the pid of the binary that made it, "redlatch-chaos-<pid>-<random>".
func sweepStale() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), "redlatch-chaos-*-*"))
	for _, d := range dirs {
		f := strings.Split(filepath.Base(d), "-")
		if len(f) != 4 {
			continue
		}
		pid, err := strconv.Atoi(f[2])
		if err != nil || pid <= 0 || pid == os.Getpid() {
			continue
		}
		if errors.Is(syscall.Kill(pid, 0), syscall.ESRCH) {
			_ = os.RemoveAll(d)
		}
	}
}

// Start starts the (stopped or killed) server again on its port, empty.
func (s *Server) Start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd != nil {
		return fmt.Errorf("chaos: server %s already running", s.Addr)
	}
	log, err := os.OpenFile(filepath.Join(s.dir, "server.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	cmd := exec.Command(ServerBinary(), s.args...)
	cmd.Dir = s.dir
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	err = cmd.Start()
	_ = log.Close()
	if err != nil {
		return fmt.Errorf("chaos: start redis-server: %w", err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	s.cmd, s.done = cmd, done
	rdb := redis.NewClient(&redis.Options{Addr: s.Addr, MaxRetries: -1, DialTimeout: 200 * time.Millisecond})
	defer rdb.Close()
	for deadline := time.Now().Add(10 * time.Second); ; {
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		info, err := rdb.Info(ctx, "server").Result()
		cancel()
		if err == nil && !strings.Contains(info, "process_id:"+strconv.Itoa(cmd.Process.Pid)+"\r\n") {
			err = errors.New("another process answers on the port")
		}
		if err == nil {
			return nil
		}
		select {
		case <-done:
			s.cmd, s.done = nil, nil
			b, _ := os.ReadFile(filepath.Join(s.dir, "server.log"))
			return fmt.Errorf("chaos: redis-server on %s exited: %s", s.Addr, b)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.killLocked()
			return fmt.Errorf("chaos: redis-server on %s did not answer: %w", s.Addr, err)
		}
	}
}

func (s *Server) signal(sig syscall.Signal) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return fmt.Errorf("chaos: server %s not running", s.Addr)
	}
	return s.cmd.Process.Signal(sig)
}

// Stop pauses the server (SIGSTOP): connections stay open, nothing answers.
// It returns once the process is stopped (state T in /proc), so that what a
// client sends after Stop returns is not served before Cont.
func (s *Server) Stop() error {
	if err := s.signal(syscall.SIGSTOP); err != nil {
		return err
	}
	s.mu.Lock()
	pid := s.cmd.Process.Pid
	s.mu.Unlock()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		if err != nil {
			return nil // no procfs: as before, the signal is sent
		}
		// pid (comm) state ...: the state follows the last ')'.
		if i := bytes.LastIndexByte(b, ')'); i >= 0 && i+2 < len(b) && (b[i+2] == 'T' || b[i+2] == 't') {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("chaos: server %s not stopped 5s after SIGSTOP", s.Addr)
		}
	}
}

// Cont resumes a paused server (SIGCONT).
func (s *Server) Cont() error { return s.signal(syscall.SIGCONT) }

// Kill kills the server (SIGKILL) and waits for it to exit. Its data is gone.
func (s *Server) Kill() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.killLocked()
}

func (s *Server) killLocked() {
	if s.cmd == nil {
		return
	}
	s.resets = append(s.resets, Mono())
	_ = s.cmd.Process.Kill()
	<-s.done
	s.cmd, s.done = nil, nil
}

// Restart kills the server and starts it again, empty, on the same port.
func (s *Server) Restart() error {
	s.Kill()
	return s.Start()
}

// Close kills the server and removes its directory.
func (s *Server) Close() {
	s.Kill()
	_ = os.RemoveAll(s.dir)
}
