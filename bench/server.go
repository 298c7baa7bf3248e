package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"
)

// server is a private redis-server on a free 127.0.0.1 port, without
// persistence, started for one benchmark run. It dies with this process
// (Pdeathsig), so an interrupted run leaves no server behind.
type server struct {
	addr string
	dir  string
	cmd  *exec.Cmd
	done chan struct{} // closed once the process has been reaped
}

// serverBinary is $REDLATCH_REDIS_SERVER (as for the root module's tests),
// else $REDIS_SERVER, else redis-server.
func serverBinary() string {
	for _, env := range []string{"REDLATCH_REDIS_SERVER", "REDIS_SERVER"} {
		if b := os.Getenv(env); b != "" {
			return b
		}
	}
	return "redis-server"
}

// startServer starts a redis-server and waits until it answers PING. It
// tries a few fresh ports, since another process may take a port between
// picking it and the server's bind.
func startServer() (*server, error) {
	bin, err := exec.LookPath(serverBinary())
	if err != nil {
		return nil, fmt.Errorf("no redis-server to start (install it, or set REDIS_ADDR): %w", err)
	}
	var errs []error
	for attempt := 0; attempt < 5; attempt++ {
		s, err := tryStart(bin)
		if err == nil {
			return s, nil
		}
		errs = append(errs, err)
	}
	return nil, errors.Join(errs...)
}

func tryStart(bin string) (*server, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	port := l.Addr().(*net.TCPAddr).Port
	_ = l.Close()
	dir, err := os.MkdirTemp("", "redlatch-bench-")
	if err != nil {
		return nil, err
	}
	p := strconv.Itoa(port)
	cmd := exec.Command(bin, "--port", p, "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--dir", dir, "--protected-mode", "no")
	log, err := os.Create(dir + "/server.log")
	if err != nil {
		_ = os.RemoveAll(dir)
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	err = cmd.Start()
	_ = log.Close()
	if err != nil {
		_ = os.RemoveAll(dir)
		return nil, err
	}
	s := &server{addr: "127.0.0.1:" + p, dir: dir, cmd: cmd, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(s.done) }()
	if err := s.waitReady(); err != nil {
		out, _ := os.ReadFile(dir + "/server.log")
		s.close()
		return nil, fmt.Errorf("redis-server on %s: %w\n%s", s.addr, err, strings.TrimSpace(string(out)))
	}
	return s, nil
}

// waitReady polls the server with PING for up to 5s and checks that the
// process answering is this one.
func (s *server) waitReady() error {
	rdb := redis.NewClient(&redis.Options{Addr: s.addr, DialTimeout: 250 * time.Millisecond, MaxRetries: -1})
	defer rdb.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		select {
		case <-s.done:
			return errors.New("exited")
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		info, err := rdb.Info(ctx, "server").Result()
		cancel()
		if err == nil {
			if strings.Contains(info, "process_id:"+strconv.Itoa(s.cmd.Process.Pid)+"\r\n") {
				return nil
			}
			err = errors.New("another process answers on the port")
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no answer after 5s: %w", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// close kills the server, waits for it and removes its directory.
func (s *server) close() {
	_ = s.cmd.Process.Kill()
	<-s.done
	_ = os.RemoveAll(s.dir)
}
