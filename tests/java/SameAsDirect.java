// "Same as direct" scenarios with pgjdbc; prints one JSON line of what the driver observed.
//
//   java -cp /usr/share/java/postgresql.jar:<classes> SameAsDirect <scenario> <jdbc-url>
//
// The test runs each scenario straight to the server and through neonlocal and compares.
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import org.postgresql.PGConnection;
import org.postgresql.PGNotification;

public final class SameAsDirect {
    private SameAsDirect() {}

    public static void main(String[] args) throws Exception {
        String scenario = args[0];
        try (Connection conn = DriverManager.getConnection(args[1])) {
            switch (scenario) {
                case "pid":
                    System.out.println("{\"agrees\": " + pidAgrees(conn) + "}");
                    break;
                case "ownNotify":
                    System.out.println(ownNotify(conn));
                    break;
                case "terminateOwn":
                    System.out.println(terminateOwn(conn, args[1]));
                    break;
                default:
                    throw new IllegalArgumentException("no scenario " + scenario);
            }
        }
    }

    private static int queryInt(Connection conn, String sql) throws SQLException {
        try (Statement st = conn.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            rs.next();
            return rs.getInt(1);
        }
    }

    private static boolean pidAgrees(Connection conn) throws SQLException {
        int driverPid = conn.unwrap(PGConnection.class).getBackendPID();
        return driverPid == queryInt(conn, "SELECT pg_backend_pid()");
    }

    private static String ownNotify(Connection conn) throws SQLException {
        PGConnection pg = conn.unwrap(PGConnection.class);
        try (Statement st = conn.createStatement()) {
            st.execute("LISTEN same_as_direct");
            st.execute("NOTIFY same_as_direct, 'hello'");
        }
        PGNotification[] notes = pg.getNotifications(5000);
        if (notes == null || notes.length == 0) {
            return "{\"received\": false}";
        }
        boolean own = notes[0].getPID() == pg.getBackendPID();
        return "{\"received\": true, \"own\": " + own + "}";
    }

    private static String terminateOwn(Connection conn, String url) throws SQLException {
        int pid = conn.unwrap(PGConnection.class).getBackendPID();
        boolean ended;
        try (Connection other = DriverManager.getConnection(url);
                Statement st = other.createStatement();
                ResultSet rs = st.executeQuery("SELECT pg_terminate_backend(" + pid + ")")) {
            rs.next();
            ended = rs.getBoolean(1);
        }
        String state = "none";
        try {
            queryInt(conn, "SELECT 1");
        } catch (SQLException e) {
            state = e.getSQLState();
        }
        return "{\"terminated\": " + ended + ", \"next_query\": \"" + state + "\"}";
    }
}
