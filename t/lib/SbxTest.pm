package SbxTest;

# Test harness for ngx_sbx_module: starts nginx (and optionally Redis) on
# loopback ports with a generated configuration in a temporary prefix, talks
# HTTP to it, inspects its processes and its error log, and stops everything
# it started.
#
#   use lib 't/lib'; use SbxTest;
#   my $t = SbxTest->new;
#   $t->write_file('hello.lua', 'return function(req) return {status=200, body="hi"} end');
#   $t->conf(<<'EOF');
#   sbx_connector hello { script %%PREFIX%%/hello.lua; }
#   server { listen 127.0.0.1:%%PORT%%; location / { sbx_connector hello; } }
#   EOF
#   $t->start;
#   is($t->get('/')->{content}, 'hi');
#   $t->check_error_log;
#
# Environment: SBX_BUILD (directory holding ngx_http_sbx_module.so and
# sbx-lua-helper, default <repo>/build), SBX_NGINX (nginx binary, default
# /usr/sbin/nginx), SBX_KEEP=1 (keep the prefix directory).

use strict;
use warnings;

use Carp qw(croak);
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Path qw(remove_tree);
use File::Temp qw(tempdir);
use HTTP::Tiny;
use IO::Socket::INET;
use POSIX qw(WNOHANG);
use Scalar::Util qw(weaken);
use Test::More;
use Time::HiRes qw(sleep time);

our $VERSION = '1.00';

my $ROOT = abs_path(dirname(__FILE__) . '/../..');

my @INSTANCES;      # every live harness object, for END
my %USED_PORTS;     # ports handed out by this process

sub root { return $ROOT }

sub build_dir {
    return $ENV{SBX_BUILD} // "$ROOT/build";
}

sub nginx_bin {
    return $ENV{SBX_NGINX} // '/usr/sbin/nginx';
}

sub helper_bin {
    return build_dir() . '/sbx-lua-helper';
}

sub new {
    my ($class, %opts) = @_;

    my $prefix = tempdir('sbx-test-XXXXXXXX', TMPDIR => 1, CLEANUP => 0);
    chmod 0755, $prefix or croak "chmod $prefix: $!";

    my $self = bless {
        prefix    => abs_path($prefix),
        ports     => {},
        main_conf => '',
        http_conf => '',
        workers   => 1,
        owner     => $$,
        running   => 0,
    }, $class;

    push @INSTANCES, $self;
    weaken($INSTANCES[-1]);
    return $self;
}

sub prefix { return $_[0]{prefix} }

# ---- ports -------------------------------------------------------------

sub _free_port {
    for (1 .. 100) {
        my $sock = IO::Socket::INET->new(
            LocalAddr => '127.0.0.1',
            LocalPort => 0,
            Proto     => 'tcp',
            Listen    => 1,
            ReuseAddr => 1,
        ) or croak "cannot bind a loopback port: $!";
        my $port = $sock->sockport;
        close $sock;
        next if $USED_PORTS{$port}++;
        return $port;
    }
    croak 'no free loopback port';
}

sub port {
    my ($self, $n) = @_;
    $n //= 1;
    return $self->{ports}{$n} //= _free_port();
}

# ---- files and configuration -----------------------------------------------

sub write_file {
    my ($self, $name, $text) = @_;
    my $path = $name =~ m{^/} ? $name : "$self->{prefix}/$name";
    my $dir = dirname($path);
    unless (-d $dir) {
        require File::Path;
        File::Path::make_path($dir, { mode => 0755 });
    }
    open my $fh, '>', $path or croak "write $path: $!";
    binmode $fh;
    print {$fh} $text;
    close $fh or croak "close $path: $!";
    chmod 0644, $path;
    return $path;
}

sub read_file {
    my ($self, $name) = @_;
    my $path = $name =~ m{^/} ? $name : "$self->{prefix}/$name";
    open my $fh, '<', $path or return undef;
    binmode $fh;
    local $/;
    my $text = <$fh>;
    close $fh;
    return $text;
}

sub main_conf {
    my ($self, $text) = @_;
    $self->{main_conf} = $text if defined $text;
    return $self->{main_conf};
}

sub conf {
    my ($self, $text) = @_;
    $self->{http_conf} = $text if defined $text;
    return $self->{http_conf};
}

sub _subst {
    my ($self, $text) = @_;
    $text =~ s/%%PORT(\d*)%%/$self->port($1 eq '' ? 1 : $1)/ge;
    $text =~ s/%%PREFIX%%/$self->{prefix}/g;
    $text =~ s/%%ROOT%%/$ROOT/g;
    $text =~ s/%%BUILD%%/build_dir()/ge;
    $text =~ s/%%HELPER%%/helper_bin()/ge;
    if ($text =~ /%%REDIS_PORT%%/) {
        my $rp = $self->{redis_port} // croak 'conf uses %%REDIS_PORT%% '
            . 'but redis_start was not called';
        $text =~ s/%%REDIS_PORT%%/$rp/g;
    }
    return $text;
}

sub conf_path { return "$_[0]{prefix}/nginx.conf" }

sub _conf_text {
    my ($self) = @_;
    my $p = $self->{prefix};
    my $build = build_dir();
    my $main = $self->_subst($self->{main_conf});
    my $http = $self->_subst($self->{http_conf});

    # A build outside <repo>/build may carry a default helper path that is
    # not where the helper was built: point at it unless the test says
    # where the helper is itself.  Appended after the test's lines so that
    # their line numbers do not depend on it.
    my $helper = '';
    if (defined $ENV{SBX_BUILD} && $http !~ /\bsbx_helper_path\b/) {
        $helper = "sbx_helper_path $build/sbx-lua-helper;\n";
    }

    $main .= "\n" if length $main && $main !~ /\n\z/;
    $http .= "\n" if length $http && $http !~ /\n\z/;

    return <<"EOF";
load_module $build/ngx_http_sbx_module.so;
worker_processes $self->{workers};
daemon on;
master_process on;
error_log $p/error.log info;
pid $p/nginx.pid;
${main}events {
    worker_connections 1024;
}
http {
access_log $p/access.log;
client_body_temp_path $p/client_body_temp;
proxy_temp_path $p/proxy_temp;
fastcgi_temp_path $p/fastcgi_temp;
uwsgi_temp_path $p/uwsgi_temp;
scgi_temp_path $p/scgi_temp;
${http}${helper}}
EOF
}

sub write_conf {
    my ($self) = @_;
    my $path = $self->conf_path;
    $self->write_file($path, $self->_conf_text);
    return $path;
}

# The generated nginx.conf text (placeholders replaced).
sub conf_text { return $_[0]->_conf_text }

# Line number in the generated nginx.conf of the first line matching $re
# (a regexp or a literal string); undef if none.
sub conf_line {
    my ($self, $re) = @_;
    $re = qr/\Q$re\E/ unless ref $re;
    my @lines = split /\n/, $self->_conf_text;
    for my $i (0 .. $#lines) {
        return $i + 1 if $lines[$i] =~ $re;
    }
    return undef;
}

sub _nginx_cmd {
    my ($self, @extra) = @_;
    my $p = $self->{prefix};
    return (nginx_bin(), '-p', "$p/", '-c', "$p/nginx.conf",
            '-e', "$p/error.log", @extra);
}

sub _run {
    my (@cmd) = @_;
    my $timeout = ref $cmd[0] eq 'HASH' ? shift(@cmd)->{timeout} : undef;
    $timeout //= 60;
    my $pid = open my $fh, '-|';
    croak "fork: $!" unless defined $pid;
    if ($pid == 0) {
        open STDERR, '>&', \*STDOUT;
        open STDIN, '<', '/dev/null';
        exec { $cmd[0] } @cmd or POSIX::_exit(127);
    }
    my $out = '';
    my $deadline = time + $timeout;
    my $timed_out = 0;
    while (1) {
        my $left = $deadline - time;
        if ($left <= 0) {
            $timed_out = 1;
            kill 'KILL', $pid;
            last;
        }
        my $rin = '';
        vec($rin, fileno($fh), 1) = 1;
        my $n = select(my $rout = $rin, undef, undef, $left > 0.5 ? 0.5 : $left);
        next unless $n && $n > 0;
        my $r = sysread($fh, my $buf, 65536);
        last unless $r;
        $out .= $buf;
    }
    close $fh;
    return (124, $out . "\n[timed out after ${timeout}s]\n") if $timed_out;
    my $rc = $? == -1 ? 127 : ($? & 127 ? 128 + ($? & 127) : $? >> 8);
    return ($rc, $out);
}

# Runs a command (list form, no shell) and returns ($exit_code, $output)
# with stderr merged into the output; killed after $opts{timeout} seconds
# (exit code 124 then).
sub run_cmd {
    my ($self, $cmd, %opts) = @_;
    return _run({ timeout => $opts{timeout} }, @$cmd);
}

sub nginx_t {
    my ($self, %opts) = @_;
    $self->write_conf;
    return _run({ timeout => $opts{timeout} // 60 }, $self->_nginx_cmd('-t'));
}

# ---- error log ---------------------------------------------------------

sub error_log {
    my ($self) = @_;
    return $self->read_file('error.log') // '';
}

sub _log_tail {
    my ($self, $n) = @_;
    $n //= 30;
    my @lines = split /\n/, $self->error_log;
    @lines = @lines[-$n .. -1] if @lines > $n;
    return join("\n", @lines);
}

sub check_error_log {
    my ($self, %opts) = @_;
    my @allow = @{ $opts{allow} // [] };
    my $bad = qr/\[alert\]|\[emerg\]|\[crit\]|exited on signal|AddressSanitizer
                 |runtime\ error:|LeakSanitizer/x;
    my @found;
    for my $line (split /\n/, $self->error_log) {
        next unless $line =~ $bad;
        next if grep { $line =~ $_ } @allow;
        push @found, $line;
    }
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    my $ok = ok(!@found, $opts{name} // 'error log has no alert, emerg, '
                . 'crit, crash or sanitizer lines');
    if (!$ok) {
        my @show = @found > 20 ? @found[0 .. 19] : @found;
        diag(join("\n", @show, @found > 20 ? ('...') : ()));
    }
    return $ok;
}

# ---- processes ---------------------------------------------------------

sub alive { my ($self, $pid) = @_ > 1 ? @_ : (undef, @_); return _alive($pid) }

sub _alive {
    my ($pid) = @_;
    return 0 unless $pid;
    open my $fh, '<', "/proc/$pid/stat" or return 0;
    my $stat = <$fh> // '';
    close $fh;
    # "pid (comm) S ..." where comm may hold spaces and parentheses
    return 0 unless $stat =~ /\)\s+(\S)\s/;
    return $1 ne 'Z' && $1 ne 'X';
}

# The contents of a file (a /proc file, say), or undef when it cannot be
# read.
sub slurp {
    my ($path) = @_;
    open my $fh, '<', $path or return undef;
    local $/;
    my $s = <$fh>;
    close $fh;
    return $s;
}

# How many fds a process has open, -1 when it is gone.
sub fd_count {
    my ($pid) = @_;
    opendir my $dh, "/proc/$pid/fd" or return -1;
    my $n = grep { /^\d+$/ } readdir $dh;
    closedir $dh;
    return $n;
}

sub _ppid_map {
    my %children;
    opendir my $dh, '/proc' or return {};
    for my $pid (grep { /^\d+$/ } readdir $dh) {
        open my $fh, '<', "/proc/$pid/stat" or next;
        my $stat = <$fh> // '';
        close $fh;
        next unless $stat =~ /\)\s+(\S)\s+(\d+)/;
        next if $1 eq 'Z' || $1 eq 'X';
        push @{ $children{$2} }, $pid;
    }
    closedir $dh;
    return \%children;
}

sub children_of {
    my ($self, $pid) = @_;
    my @s = sort { $a <=> $b } @{ _ppid_map()->{$pid} // [] };
    return wantarray ? @s : scalar @s;
}

sub master_pid {
    my ($self) = @_;
    my $text = $self->read_file('nginx.pid') // return undef;
    my ($pid) = $text =~ /(\d+)/ or return undef;
    return _alive($pid) ? $pid : undef;
}

sub worker_pids {
    my ($self) = @_;
    my $master = $self->master_pid // return ();
    return grep { _cmdline($_) !~ /cache (?:manager|loader)/ }
        $self->children_of($master);
}

sub _comm {
    my ($pid) = @_;
    open my $fh, '<', "/proc/$pid/comm" or return '';
    my $c = <$fh> // '';
    close $fh;
    chomp $c;
    return $c;
}

sub _cmdline {
    my ($pid) = @_;
    open my $fh, '<', "/proc/$pid/cmdline" or return '';
    local $/;
    my $c = <$fh> // '';
    close $fh;
    $c =~ s/\0/ /g;
    return $c;
}

sub _is_helper {
    my ($pid) = @_;
    my $exe = readlink "/proc/$pid/exe";
    return $exe =~ m{sbx-lua-helper(?: \(deleted\))?\z} if defined $exe;
    return _comm($pid) =~ /^sbx-lua-helper/;
}

sub helper_pids {
    my ($self, $worker) = @_;
    my $map = _ppid_map();
    my @workers = defined $worker ? ($worker) : $self->worker_pids;
    my @h;
    for my $w (@workers) {
        push @h, grep { _is_helper($_) } @{ $map->{$w} // [] };
    }
    my @s = sort { $a <=> $b } @h;
    return wantarray ? @s : scalar @s;   # a count in scalar context
}

# Helper pids grouped by worker: { worker_pid => [helper pids] }.
sub helpers_by_worker {
    my ($self) = @_;
    my $map = _ppid_map();
    my %by;
    for my $w ($self->worker_pids) {
        $by{$w} = [ sort { $a <=> $b }
                    grep { _is_helper($_) } @{ $map->{$w} // [] } ];
    }
    return \%by;
}

sub wait_for {
    my ($self, $cond, $timeout) = @_;
    $timeout //= 10;
    my $deadline = time + $timeout;
    while (1) {
        my $r = $cond->();
        return $r if $r;
        return $r if time >= $deadline;
        sleep 0.05;
    }
}

sub _port_open {
    my ($port) = @_;
    my $s = IO::Socket::INET->new(
        PeerAddr => '127.0.0.1',
        PeerPort => $port,
        Proto    => 'tcp',
        Timeout  => 1,
    ) or return 0;
    close $s;
    return 1;
}

sub _listen_ports {
    my ($self) = @_;
    my @ports;
    my $http = $self->_subst($self->{http_conf});
    while ($http =~ /^\s*listen\s+(?:127\.0\.0\.1:)?(\d+)/mg) {
        push @ports, $1;
    }
    return @ports;
}

sub start {
    my ($self, %opts) = @_;
    croak 'nginx already running' if $self->{running};
    $self->{workers} = $opts{workers} // $self->{workers} // 1;
    $self->{expect_helpers} = $opts{helpers};
    $self->write_conf;
    unlink "$self->{prefix}/nginx.pid";

    my ($rc, $out) = _run($self->_nginx_cmd);
    if ($rc != 0) {
        croak "nginx failed to start (exit $rc):\n$out\n--- error.log:\n"
            . $self->_log_tail;
    }
    $self->{running} = 1;

    my $master = $self->wait_for(sub { $self->master_pid }, 10);
    unless ($master) {
        croak "nginx wrote no pid file\n--- error.log:\n" . $self->_log_tail;
    }
    $self->{master} = $master;

    my @ports = $self->_listen_ports;
    my $up = $self->wait_for(sub {
        return 0 unless $self->worker_pids >= $self->{workers};
        for my $p (@ports) {
            return 0 unless _port_open($p);
        }
        return 1;
    }, 10);
    unless ($up) {
        $self->stop;
        croak "nginx did not come up on ports @ports\n--- error.log:\n"
            . $self->_log_tail;
    }
    return 1;
}

sub _signal {
    my ($self, $sig) = @_;
    my $master = $self->master_pid // croak 'nginx is not running';
    kill $sig, $master or croak "kill $sig $master: $!";
    return $master;
}

# Writes the configuration again and sends HUP; waits until the old workers
# are gone and the new ones answer.  Dies when the new configuration is
# refused, unless called as reload(may_fail => 1), which returns 0 then.
sub reload {
    my ($self, %opts) = @_;
    my %old = map { $_ => 1 } $self->worker_pids;
    my $log_len = length $self->error_log;
    $self->write_conf;
    $self->_signal('HUP');

    my $timeout = $opts{timeout} // 20;
    my $done = $self->wait_for(sub {
        my $log = substr($self->error_log, $log_len);
        if ($log =~ /\[emerg\]/) {
            return -1;
        }
        my @now = $self->worker_pids;
        my @new = grep { !$old{$_} } @now;
        return 0 if @new < $self->{workers};
        return 0 if grep { $old{$_} } @now;
        return 1;
    }, $timeout);

    if (!$done || $done < 0) {
        my $why = $done ? 'refused the new configuration'
                        : 'did not replace its workers';
        return 0 if $opts{may_fail};
        croak "reload: nginx $why\n--- error.log:\n" . $self->_log_tail;
    }

    my @ports = $self->_listen_ports;
    $self->wait_for(sub { !grep { !_port_open($_) } @ports }, 10);
    return 1;
}

sub reopen {
    my ($self) = @_;
    $self->_signal('USR1');
    return 1;
}

sub _wait_gone {
    my ($timeout, @pids) = @_;
    my $deadline = time + $timeout;
    while (time < $deadline) {
        @pids = grep { _alive($_) } @pids;
        return 1 unless @pids;
        sleep 0.05;
    }
    return !grep { _alive($_) } @pids;
}

sub _family {
    my ($self, $master) = @_;
    my $map = _ppid_map();
    my @all;
    my @todo = ($master);
    while (@todo) {
        my $p = shift @todo;
        for my $c (@{ $map->{$p} // [] }) {
            push @all, $c;
            push @todo, $c;
        }
    }
    return @all;
}

sub stop {
    my ($self, %opts) = @_;
    return 1 unless $self->{running};
    $self->{running} = 0;
    my $master = $self->master_pid // $self->{master};
    return 1 unless $master && _alive($master);

    # everything below the master, including helpers, so that nothing is
    # left behind even if a helper misses its worker's exit
    my @family = $self->_family($master);
    my %exe = map { $_ => (readlink("/proc/$_/exe") // '') } @family;

    kill 'QUIT', $master;
    unless (_wait_gone($opts{timeout} // 10, $master)) {
        kill 'TERM', $master;
        unless (_wait_gone(3, $master)) {
            kill 'KILL', $master;
            _wait_gone(3, $master);
        }
    }

    my @left = grep { _alive($_) } @family, $self->_family($master);
    if (@left && !_wait_gone(3, @left)) {
        for my $pid (grep { _alive($_) } @left) {
            # only a process that still runs what it ran before
            my $exe = readlink("/proc/$pid/exe") // '';
            next if exists $exe{$pid} && $exe ne $exe{$pid};
            kill 'KILL', $pid;
        }
        _wait_gone(3, @left);
    }
    return 1;
}

# ---- HTTP --------------------------------------------------------------

sub request {
    my ($self, $method, $path, $opts) = @_;
    $opts //= {};
    my $port = $opts->{port} // $self->port;
    my $url = $path =~ m{^https?://} ? $path : "http://127.0.0.1:$port$path";
    my $http = HTTP::Tiny->new(
        timeout    => $opts->{timeout} // 10,
        keep_alive => 0,
        max_redirect => 0,
        agent      => 'sbx-test/1',
    );
    my %args;
    $args{headers} = $opts->{headers} if $opts->{headers};
    $args{content} = $opts->{content} if defined $opts->{content};
    return $http->request($method, $url, \%args);
}

sub get {
    my ($self, $path, $opts) = @_;
    return $self->request('GET', $path, $opts);
}

sub post {
    my ($self, $path, $body, $opts) = @_;
    return $self->request('POST', $path, { %{ $opts // {} }, content => $body });
}

# Sends a raw request on a fresh socket and returns the raw answer
# (until the server closes or $timeout passes).
sub raw_request {
    my ($self, $text, %opts) = @_;
    my $s = IO::Socket::INET->new(
        PeerAddr => '127.0.0.1',
        PeerPort => $opts{port} // $self->port,
        Proto    => 'tcp',
        Timeout  => 5,
    ) or return undef;
    print {$s} $text;
    my $out = '';
    my $deadline = time + ($opts{timeout} // 10);
    $s->blocking(0);
    while (time < $deadline) {
        my $rin = '';
        vec($rin, fileno($s), 1) = 1;
        my $n = select(my $rout = $rin, undef, undef, 0.1);
        next unless $n;
        my $r = sysread($s, my $buf, 65536);
        last if !defined $r && !$!{EAGAIN};
        last if defined $r && $r == 0;
        $out .= $buf if $r;
    }
    close $s;
    return $out;
}

# A raw TCP server on a free loopback port, for upstreams nginx cannot
# play (answers that break off, 101 handshakes): a child process accepts
# and runs $handler->($socket, $request_line, {lower-case headers}) in a
# process of its own per connection.  Returns (port, pid); stop it with
# SbxTest::raw_server_stop($pid).
sub raw_server {
    my ($handler) = @_;
    my $srv = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0,
                                    Listen => 16, ReuseAddr => 1)
        or croak "listen: $!";
    my $port = $srv->sockport;
    my $pid = fork // croak "fork: $!";
    if ($pid == 0) {
        $SIG{CHLD} = 'IGNORE';
        while (my $c = $srv->accept) {
            my $kid = fork;
            if (defined $kid && $kid == 0) {
                my %h;
                my $line = <$c> // '';
                while (my $l = <$c>) {
                    last if $l =~ /^\r?\n$/;
                    $h{lc $1} = $2 if $l =~ /^([^:]+):\s*(.*?)\r?$/;
                }
                $c->autoflush(1);
                $handler->($c, $line, \%h);
                close $c;
                POSIX::_exit(0);
            }
            close $c;
        }
        POSIX::_exit(0);
    }
    close $srv;
    return ($port, $pid);
}

sub raw_server_stop {
    my ($pid) = @_;
    kill 'TERM', $pid;
    waitpid($pid, 0);
}

# Asserts (as one ok()) that $r is the module's error answer: status
# $status, Content-Type application/json and a body that is exactly
# {"error":"$code","request_id":"<id>"} (a trailing newline allowed).
# Returns the request id, or undef.
sub error_ok {
    my ($self, $r, $status, $code, $name) = @_;
    $name //= "$status $code";
    my @why;
    push @why, "status $r->{status}, expected $status"
        if ($r->{status} // 0) != $status;
    my $ct = $r->{headers}{'content-type'} // '';
    $ct = join(',', @$ct) if ref $ct;
    push @why, "content-type '$ct'" unless $ct =~ m{^application/json\b}i;
    my $body = $r->{content} // '';
    my $id;
    if ($body =~ /\A\{"error":"\Q$code\E","request_id":"([^"\\\s]+)"\}\z/) {
        $id = $1;
    } else {
        push @why, "body '" . substr($body, 0, 300) . "'";
    }
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    ok(!@why, $name) or diag(join('; ', @why));
    return $id;
}

# ---- Redis -------------------------------------------------------------

sub redis_port { return $_[0]{redis_port} }

sub redis_start {
    my ($self, %opts) = @_;
    croak 'redis already running' if $self->{redis_pid};
    my $port = $opts{port} // $self->{redis_port} // _free_port();
    my $p = $self->{prefix};
    my @args = ('redis-server', '--port', $port, '--bind', '127.0.0.1',
                '--save', '', '--appendonly', 'no', '--daemonize', 'no',
                '--dir', $p, '--logfile', "$p/redis.log",
                '--protected-mode', 'no');
    if (defined $opts{requirepass}) {
        push @args, '--requirepass', $opts{requirepass};
    }
    if ($opts{unixsocket}) {
        my $sock = $opts{unixsocket} =~ m{/} ? $opts{unixsocket}
                                              : "$p/redis.sock";
        push @args, '--unixsocket', $sock, '--unixsocketperm', '777';
        $self->{redis_socket} = $sock;
    }
    push @args, @{ $opts{args} // [] };

    my $pid = fork // croak "fork: $!";
    if ($pid == 0) {
        open STDIN, '<', '/dev/null';
        open STDOUT, '>>', "$p/redis.out";
        open STDERR, '>&', \*STDOUT;
        exec { 'redis-server' } @args or POSIX::_exit(127);
    }
    $self->{redis_pid} = $pid;
    $self->{redis_port} = $port;
    $self->{redis_pass} = $opts{requirepass};

    my $up = $self->wait_for(sub {
        return -1 if waitpid($pid, WNOHANG) == $pid;
        my ($rc, $out) = _run($self->_redis_cli_cmd('PING'));
        return $out =~ /PONG/ ? 1 : 0;
    }, 10);
    if (!$up || $up < 0) {
        my $log = ($self->read_file('redis.log') // '')
                . ($self->read_file('redis.out') // '');
        delete $self->{redis_pid} if $up && $up < 0;
        $self->redis_stop;
        croak "redis-server did not start on port $port\n$log";
    }
    return $port;
}

sub redis_socket { return $_[0]{redis_socket} }

sub _redis_cli_cmd {
    my ($self, @args) = @_;
    my @cmd = ('redis-cli', '-h', '127.0.0.1', '-p', $self->{redis_port});
    if (defined $self->{redis_pass}) {
        push @cmd, '-a', $self->{redis_pass}, '--no-auth-warning';
    }
    return (@cmd, @args);
}

sub redis_cli {
    my ($self, @args) = @_;
    croak 'redis is not started' unless $self->{redis_port};
    my ($rc, $out) = _run($self->_redis_cli_cmd(@args));
    $out =~ s/\n\z//;
    return $out;
}

sub redis_stop {
    my ($self) = @_;
    my $pid = delete $self->{redis_pid} or return 1;
    kill 'TERM', $pid;
    my $deadline = time + 5;
    while (time < $deadline) {
        return 1 if waitpid($pid, WNOHANG) == $pid;
        sleep 0.05;
    }
    kill 'KILL', $pid;
    waitpid($pid, 0);
    return 1;
}

# ---- cleanup -----------------------------------------------------------

sub cleanup {
    my ($self) = @_;
    return if $self->{cleaned} || $self->{owner} != $$;
    $self->{cleaned} = 1;
    eval { $self->stop; 1 } or warn "stop: $@";
    eval { $self->redis_stop; 1 } or warn "redis_stop: $@";
    if (!$ENV{SBX_KEEP} && -d $self->{prefix}) {
        remove_tree($self->{prefix}, { safe => 1 });
    } elsif ($ENV{SBX_KEEP}) {
        print STDERR "# SBX_KEEP: prefix kept at $self->{prefix}\n";
    }
    @INSTANCES = grep { defined $_ && $_ != $self } @INSTANCES;
    weaken($_) for @INSTANCES;
    return 1;
}

sub DESTROY {
    my ($self) = @_;
    local ($?, $@, $!);
    $self->cleanup;
}

END {
    local ($?, $@, $!);
    for my $t (@INSTANCES) {
        $t->cleanup if $t && $t->{owner} == $$;
    }
}

1;
