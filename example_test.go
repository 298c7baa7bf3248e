package redlatch_test

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"

	"github.com/redlatch/redlatch"
)

func exampleRedis() (*redis.Client, func()) {
	m := miniredis.NewMiniRedis()
	if err := m.Start(); err != nil {
		panic(err)
	}
	rdb := redis.NewClient(&redis.Options{Addr: m.Addr()})
	return rdb, func() { _ = rdb.Close(); m.Close() }
}

func ExampleMutex() {
	rdb, done := exampleRedis()
	defer done()
	ctx := context.Background()
	client := redlatch.New(rdb)
	defer client.Close()

	m := client.Mutex("orders:export")
	if err := m.Lock(ctx); err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("held, token > 0:", m.Token() > 0)

	// Another owner is kept out.
	ok, _ := client.Mutex("orders:export").TryLock(ctx)
	fmt.Println("other owner got it:", ok)

	fmt.Println(m.Unlock(ctx))
	// Output:
	// held, token > 0: true
	// other owner got it: false
	// <nil>
}

func ExampleReentrantMutex() {
	rdb, done := exampleRedis()
	defer done()
	ctx := context.Background()
	client := redlatch.New(rdb)
	defer client.Close()

	m := client.ReentrantMutex("account:17")
	_ = m.Lock(ctx)
	token := m.Token()
	_ = m.Lock(ctx) // re-entry: counted, same token
	n, _ := m.HoldCount(ctx)
	fmt.Println("holds:", n, "same token:", m.Token() == token)
	_ = m.Unlock(ctx)
	_ = m.Unlock(ctx)
	locked, _ := m.IsLocked(ctx)
	fmt.Println("locked after two unlocks:", locked)
	// Output:
	// holds: 2 same token: true
	// locked after two unlocks: false
}

func ExampleMutex_Lock_timeout() {
	rdb, done := exampleRedis()
	defer done()
	client := redlatch.New(rdb)
	defer client.Close()

	_ = client.Mutex("busy").Lock(context.Background())

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	err := client.Mutex("busy").Lock(ctx)
	fmt.Println(errors.Is(err, redlatch.ErrNotObtained), errors.Is(err, context.DeadlineExceeded))
	// Output: true true
}

func ExampleDo() {
	rdb, done := exampleRedis()
	defer done()
	client := redlatch.New(rdb)
	defer client.Close()

	err := redlatch.Do(context.Background(), client.Mutex("nightly-report"), func(ctx context.Context) error {
		// ctx is cancelled, with cause redlatch.ErrLost, if the lock is lost.
		fmt.Println("working under the lock")
		return nil
	})
	fmt.Println(err)
	// Output:
	// working under the lock
	// <nil>
}
