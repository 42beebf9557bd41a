<?php
// PHP's pecl memcache session handler (php-memcache, the "memcache" extension), as
// bench/cpu.py compares it: session_start() (the lock, then the read), a change,
// session_write_close() (the write, then the lock's release), N times in a row on one
// session. Prints one JSON line: wall and CPU (this process's) microseconds per cycle,
// and the session's storage key (so the caller can count its copies).
// php bench/php_memcache_session.php SAVE_PATH ITERATIONS SESSION_REDUNDANCY
// SAVE_PATH: "tcp://127.0.0.1:11211, tcp://127.0.0.1:11212, ..."
// SESSION_REDUNDANCY: memcache.session_redundancy (its default, 2, keeps two copies).
[$script, $savePath, $iterations, $redundancy] = $argv;
ini_set('session.save_handler', 'memcache');
ini_set('session.save_path', $savePath);
ini_set('memcache.session_redundancy', $redundancy);
ini_set('session.use_cookies', '0');
ini_set('session.cache_limiter', '');
ini_set('session.serialize_handler', 'php_serialize');

$id = 'bench' . getmypid() . bin2hex(random_bytes(8));
session_id($id);
session_start();
$_SESSION['history'] = str_repeat('/catalogue/item/000000', 90);  // about 2 KB
$_SESSION['n'] = 0;
session_write_close();

function cpu(): float {
    $usage = getrusage();
    return $usage['ru_utime.tv_sec'] * 1e6 + $usage['ru_utime.tv_usec']
        + $usage['ru_stime.tv_sec'] * 1e6 + $usage['ru_stime.tv_usec'];
}

$n = (int) $iterations;
$cpu = cpu();
$start = hrtime(true);
for ($i = 0; $i < $n; $i++) {
    session_start();
    $_SESSION['n'] = $i;
    session_write_close();
}
$wall = (hrtime(true) - $start) / 1e3 / $n;
$cpu = (cpu() - $cpu) / $n;
session_start();
$ok = $_SESSION['n'] === $n - 1 && strlen($_SESSION['history']) > 1000;
session_write_close();
echo json_encode(['wall_us' => $wall, 'cpu_us' => $cpu, 'ok' => $ok, 'key' => $id]), "\n";
